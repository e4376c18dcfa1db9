"""The REST API (FastAPI, served by uvicorn inside `serve`): see api/app.py for the map."""
