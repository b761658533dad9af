"""Ray Serve deployments and the artifact store of the ConsiStory service."""
