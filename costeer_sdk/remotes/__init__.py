"""The cloud side as the client sees it: the protocol (`base`) and its implementations.

`in_process` serves a model in this process (it imports the engine and torch models);
`session_http` and `openai` reach a server over HTTP and import no engine module, so a
device that only steers a remote cloud loads nothing it does not use.
"""
