"""Long-term memory: facts about each user, extracted after a reply, stored in PostgreSQL
with pgvector embeddings, recalled into later prompts; `/memories` and `/forget`.

Owns: `service` (extraction and recall), `store` (SQL), `embeddings`, `commands`, `admin`.
May import: `bot.core` types, `bot.brains`, `bot.db`, config, errors.
"""
