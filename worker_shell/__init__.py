"""pdcluster: worker_shell, the core every worker kind shares (see DESIGN.md, "One worker shell")."""
