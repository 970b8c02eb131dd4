"""Documents for the conversation and chat tests: several that say how to close something, so
that "and how do I close it?" finds the right one only through the turn before it."""

from __future__ import annotations

import httpx

DOCUMENTS = {
    "Opening a database connection": (
        "To open a database connection, call connect() with the path of the database file. "
        "The connection is ready for queries as soon as connect() returns."
    ),
    "Closing a database connection": (
        "When you are done with a database connection, call its close() method. This releases "
        "its file handles and its locks on the database file."
    ),
    "Closing application windows": (
        "How do I close it when a window hangs? Call window.close() from the console, or "
        "press Alt+F4. Closing the last window closes the application."
    ),
    "Closing a ticket": (
        "How do I close it once a support ticket is solved? Run tickets --close with its "
        "number. A closed ticket can be opened again within thirty days."
    ),
}
FIRST_QUESTION = "How do I open a database connection?"
FOLLOW_UP = "and how do I close it?"
CLOSING = "Closing a database connection"


def ingest(http: httpx.Client) -> dict[str, str]:
    """Each document ingested as text; their ids by title."""
    ids = {}
    for title, text in DOCUMENTS.items():
        answer = http.post(
            "/api/v1/ingest", params={"wait": "true"}, json={"title": title, "text": text}
        )
        assert answer.status_code in (200, 201), answer.text
        ids[title] = answer.json()["documents"][0]["id"]
    return ids
