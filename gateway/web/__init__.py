"""The web console (HTTPS, browser client certificates)."""
