"""The host's health as the cluster sees it (issue #17): the app's own probes, run by the agent
on the host (probes.py), and the report the agent sends the authority (report.py)."""
