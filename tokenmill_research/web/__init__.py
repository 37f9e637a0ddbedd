"""`tokenmill research serve`: the web page and its JSON + server-sent-events API."""
