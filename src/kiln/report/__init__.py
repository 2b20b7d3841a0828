"""The markdown report (markdown, verdict, sections), its plots, and experiment tables; reads results, runs nothing."""
