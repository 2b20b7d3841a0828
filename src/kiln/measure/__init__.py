"""What an engine costs: latency and throughput, memory and start-up, tuning trials, the machine's peak, the roofline, machine load."""
