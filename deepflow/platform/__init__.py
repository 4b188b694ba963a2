"""The serverless layer (paper §3, §5, §6): jobs, job executor, task-executor shells, cluster manager."""
