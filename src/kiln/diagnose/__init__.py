"""Where an engine departs from the fp32 graph (debug), and what keeps it within budget (repair)."""
