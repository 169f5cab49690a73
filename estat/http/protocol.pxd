# The C layout of FastHTTPProtocol when protocol.py is compiled (Cython's
# augmenting .pxd; see estat/_compiled.py).  protocol.py itself is plain
# Python.  Every attribute stays reachable from Python ("public"), and
# __dict__ keeps the protocol open to attributes set from outside.

cdef class FastHTTPProtocol:
    cdef dict __dict__
    cdef public object factory, transport, _parser, _pending, _route, _channel, peer
    cdef public object _seconds
    cdef public dict _routes
    cdef public dict _headers
    cdef public list _body
    cdef public bytes _url, _method, _path, _query
    cdef public str _version
    cdef public bint connected, _in_head, _in_message, _ending, _broken, _closing
    cdef public bint _slow_busy, _paused, _write_blocked, _deadline_is_request
    cdef public Py_ssize_t _max_body_size, _max_body_digits, _body_size, _head_bytes, _completed, _head_raw, _begun
    cdef public double deadline
    cpdef on_url(self, bytes url)
    cpdef on_header(self, bytes name, bytes value)
    cpdef on_body(self, bytes data)

cdef class _Slot:
    cdef public object data, slow, protocol
    cdef public bint close, keep_alive_10, head

cpdef str _http_version(parser, dict headers)
