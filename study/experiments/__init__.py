"""One module per experiment (its config and its job): ships, sahara, asr, swap, utility, surgery."""
