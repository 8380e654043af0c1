"""Money: the monthly spend ledger, budgets and the degrade ladder, prices, `/spend`
reports and the chart, and per-user rate limits.

Owns: `ledger`, `budgets`, `prices`, `report`, `chart`, `ratelimit`.
May import: `bot.db`, config, errors, `bot.ops.notify`, and the core command layer
(to register `/spend`).
"""
