# The C types of metrics.py's request-path metrics when it is compiled
# (Cython's augmenting .pxd; see estat/_compiled.py).  metrics.py itself is
# plain Python.  The compiled ingest core updates these through their C
# struct, not by attribute lookups.

cdef class HotCounter:
    cdef dict __dict__
    cdef public object value
    cdef object _name, _documentation
    cpdef inc(self, amount=*)

cdef class _HotChild:
    cdef public object value
    cpdef inc(self, amount=*)

cdef class HotHistogram:
    cdef dict __dict__
    cdef object _name, _documentation
    cdef tuple _bounds
    cdef list _counts
    cdef public double _sum
    cpdef observe(self, double value)
