"""FedGen-Edge ServerApp (thin Flower entry point; the ML lives in task/)."""
