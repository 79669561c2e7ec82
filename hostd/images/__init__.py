"""Image building and the image catalogue."""
