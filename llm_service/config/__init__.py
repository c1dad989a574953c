"""Configuration: the settings tree read from the environment, the slot set (built-in, file,
environment) and what each slot's engine is given (its EngineConfig and front end).

Imports engines (their config types) and sizing (to plan a slot); nothing above them.
"""
