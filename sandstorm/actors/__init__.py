"""The actor tree below the supervisor: the router, admission, planning, the warm pool, tenant
quotas, the event log, exec tracking, the recorder, and the sandbox actor (``sandbox/``)."""
