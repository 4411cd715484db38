"""`sovpack serve`: an OpenAI-compatible llama.cpp server that loads only verified bytes.

Modules, one concept each (docs/serve.md tells the whole story):

- options: the serve settings and their usage checks (no heavy imports)
- security: bind policy, API keys (constant-time), TLS and CORS checks
- target: NAME_OR_BUNDLE -> bundle directory and the trust policy to verify it under
- variant: which GGUF build of the bundle is served
- fingerprint: file identity (inode, size, times) and the fast-path verification record
- verification: verify before load; what was verified, for the engine and the audit log
- template: the chat formatter built from the verified chat template text, and the chat
  prompt's tokens (control tokens only from the template)
- slots: the bounded FIFO queue in front of N generation slots
- opened: the GGUF held open; hashed through its descriptor; what a worker maps of it
- engine: the worker processes (one per slot), their crashes and restarts
- worker: one engine worker process: a llama-cpp-python context loaded from the verified descriptor
- generation: what one request (a Job) generates on a loaded model
- requests: OpenAI request bodies (llama-cpp-python's types), sovpack's checks, the Job
- chat_messages: chat messages as clients send them, in one plain shape
- tools: function calling (tool_choice, its grammar, tool_calls whole or streamed)
- grammar: grammars from JSON schemas and from clients, checked before llama.cpp sees them
- chat_output: completions shaped into chat answers (messages, tool calls, logprobs)
- errors: OpenAI-style error bodies
- middleware: ASGI layers for auth, body size, access records
- connections: head, body and idle timeouts, and the bound on unauthenticated connections
- metrics / access_log: Prometheus text and JSON-lines per-request records
- app: the FastAPI routes
- runner: bind, verify, audit, run uvicorn, shut down gracefully

fastapi, starlette, pydantic, uvicorn and llama_cpp are imported by the modules that need them
(runner, app, worker, template, requests, responses, state), and only when `sovpack serve`
runs: the command line imports sovpack.server inside the serve command.
"""
