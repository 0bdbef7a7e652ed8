"""The root of the actor tree: the gateway, the reaper of orphans, and the take-over of
sandboxes that outlived a previous gateway."""
