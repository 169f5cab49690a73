"""
Encoders: a sealed batch becomes the objects to store, one encoder per
output format (C{OUTPUT_FORMAT}), behind one seam,
L{estat.interfaces.IEncoder}.  The store and the uploader know a format
only by its key's suffix.
"""
