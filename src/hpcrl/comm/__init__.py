"""MPI plumbing: message schemas and tags, non-blocking waits with a watchdog, collectives."""
