"""Permission names of the rotation engine's pages and actions.

Plain strings in a module of their own, so a page above rotation (the keyvault console's
managed-secret views, say) can check one without importing rotation's console.
"""

VIEW_RUN = "rotation.view_rotationrun"
START_RUN = "rotation.add_rotationrun"
APPROVE_RUN = "rotation.approve_rotationrun"
CANCEL_RUN = "rotation.cancel_rotationrun"
#: An emergency run has no grace period, whatever it rotates (a KEK or a managed secret).
EMERGENCY_RUN = "rotation.emergency_rotationrun"
TICK_STEP = "rotation.tick_runstep"
VIEW_POLICY = "rotation.view_rotationpolicy"
CHANGE_POLICY = "rotation.change_rotationpolicy"
