"""Traffic control: admission by work, the drain on shutdown, API keys, request deadlines and the
per-request record the routes fill.

Imports errors, observability and engines' types; decides whom to serve, serves no one itself.
"""
