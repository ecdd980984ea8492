"""Generated wire API of loramux (from proto/loramux/v1/); regenerate with `make proto`."""
