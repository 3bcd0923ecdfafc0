"""The query layer: every SQL statement cr_queue sends, in ``<subject>.sql`` files beside
the thin typed wrappers that run them (``<subject>.py``); ``loader.py`` reads the files."""
