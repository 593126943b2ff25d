"""Rotation engine: schedules, runs, runbooks, executors and Celery tasks."""
