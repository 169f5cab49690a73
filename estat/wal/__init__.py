"""
The write-ahead log behind C{ACK_MODE=disk}, and the acknowledgement modes
(C{disk}, C{stored}) as admission providers.
"""
