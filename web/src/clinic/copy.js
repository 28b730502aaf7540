// Copying a link, a passcode or an address for someone to send on.

/** Copies `text` and says in `status` whether it worked, or what to select and copy instead. */
export async function copy(text, status, what) {
  try {
    await navigator.clipboard.writeText(text);
    status.textContent = 'Copied.';
  } catch {
    status.textContent = `Your browser did not allow copying: select ${what} and copy it.`;
  }
}
