"""What every HTTP server in the project shares (:mod:`.guard`: loopback by default, a bearer
token, body, rate and concurrency limits), kept apart from the scheduling core it protects."""
