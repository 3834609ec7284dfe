/** A mistake the user can fix (bad file, wrong state, bad argument): one clear message, no stack needed. */
export class RuntimeUserError extends Error {
  constructor(message) {
    super(message);
    this.name = "RuntimeUserError";
  }
}
