"""
Object stores: the implementations of L{estat.interfaces.IObjectStore}.
"""
