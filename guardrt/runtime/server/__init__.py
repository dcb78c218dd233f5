"""The gRPC (and later HTTP) servers over one moderation service, scheduler and engine."""
