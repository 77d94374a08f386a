"""Running the stack: launcher and supervisor, credentials, the router's config, DynamoDB Local, the bridge client."""
