"""Room timelines (offset order, gap repair, catch-up) and presence."""
