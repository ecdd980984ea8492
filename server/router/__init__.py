"""The router: `auto` requests get the adapter(s) that fit their prompt (router.py has the whole story).

Nothing is imported here, so that `server.router.examples` stays importable without torch (the CLI's
client commands read example files with it).
"""
