"""A real serving loop on the reference engine (perfmodel serve-bench): a paged KV block pool with prefix
caching, an iteration-level scheduler (FCFS admission, chunked prefill, preemption by recompute), a ragged
runner (one forward over every scheduled sequence's new tokens), and per-request and per-step records."""
