"""The prediction service: the FastAPI app, its connection limits and its web page."""
