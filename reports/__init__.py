"""quantplan.reports: fidelity scoreboard, plots and the HTML report (reads tables, plans, checkpoints)."""
