"""The Chainlit chat: streams answers from the Serve app, keeps threads and feedback in SQL."""
