"""Generated from proto/broker/v1/broker.proto; never edit by hand."""
