"""
C{WORKERS=N}: one supervisor that owns the listening socket and N worker
processes that serve it (L{estat.workers.supervisor}), and what a worker
changes in itself to share a machine with its siblings
(L{estat.workers.worker}).
"""
