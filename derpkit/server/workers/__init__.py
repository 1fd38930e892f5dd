"""``derpkit serve -workers N``: N server processes behind one set of ports (docs/workers.md).

* supervisor.py: the parent (start-up work done once, start, restart and stop the workers);
* child.py: one worker process (the node with SO_REUSEPORT, a private loopback listener,
  the control pipe);
* relay.py: ``WorkerServer``, the relay core that makes N processes behave as one server
  (newest connection per key across workers, PeerGone only when a key is gone from all);
* siblings.py: ``SiblingLink``, the mesh link from one worker to another;
* varz.py: the summed ``/debug/varz``.
"""
