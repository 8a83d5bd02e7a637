"""The `incremental` command line: status, versions, rollback, feedback, dataset preview, run, demo."""
