# The C layout of core.py's one-pass path when it is compiled (Cython's
# augmenting .pxd; see estat/_compiled.py).  core.py itself is plain
# Python.  The counters, the histogram and the formatter are the compiled
# classes of estat/metrics.py and estat/event.py, called through their C
# structs; if those run as pure Python, this extension does not load and
# the source runs instead (one log line).

cimport cython
from estat.event cimport _ReceivedAtFormatter, _has_long_digit_run
from estat.metrics cimport HotCounter, HotHistogram

cdef class _OnePass:
    cdef public object core, write_keys, cors, dedup
    cdef public bint record_source
    cdef object _seconds, _collect, _try_admit, _accepted_plain
    cdef bint _general, _keys_required, _no_cors
    cdef Py_ssize_t _event_size
    cdef dict _ndjson_seen
    cdef _ReceivedAtFormatter _received_at
    cdef HotCounter _requests, _requests_accepted, _events_accepted
    cdef HotHistogram _duration

    @cython.locals(headers=dict, body=bytes, received=cython.double)
    cpdef handle(self, request, respond)
