"""The master process: the supervisor loop, the specs of the children it keeps running and
their restarts, reload planning, and the master/child protocol (ipc, the child lifecycle)."""
