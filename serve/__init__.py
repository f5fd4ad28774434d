"""Ray Serve streaming inference deployment and the web page to watch it."""
