"""`dmuh serve`: the HTTP service and its page."""
