"""The OpenAI-compatible face of the api (`/v1/...`): docs/openai.md."""
