"""net: how the services talk: method calls over TCP (`transport.py`).

Contract: a transport failure raises `errors.NodeUnavailable` naming the address; a call is never
retried by this layer once its request may have reached the server.
"""
