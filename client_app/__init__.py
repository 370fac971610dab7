"""FedGen-Edge ClientApp (thin Flower entry point; the ML lives in task/)."""
