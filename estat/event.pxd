# The C types of event.py's hot class when it is compiled (Cython's
# augmenting .pxd; see estat/_compiled.py).  event.py itself is plain Python.

cimport cython

cdef class _ReceivedAtFormatter:
    cdef long long _second
    cdef str _prefix

    @cython.locals(second=cython.longlong)
    cpdef str format(self, double when)

cpdef bint _has_long_digit_run(body)
