// Wall-clock times in a chosen IANA time zone, with the browser's Intl only.

/** The browser's own time zone, e.g. `Europe/Berlin`. */
export const localTimeZone = () => Intl.DateTimeFormat().resolvedOptions().timeZone;

/** Every time zone the browser knows, the local one first. */
export function timeZones() {
  const local = localTimeZone();
  const all = typeof Intl.supportedValuesOf === 'function' ? Intl.supportedValuesOf('timeZone') : [local, 'UTC'];
  return [local, ...all.filter((zone) => zone !== local)];
}

/** How far `zone` is ahead of UTC at the instant `ms`, in ms. */
function offset(ms, zone) {
  const parts = Object.fromEntries(
    new Intl.DateTimeFormat('en-US', {
      timeZone: zone, hourCycle: 'h23', year: 'numeric', month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit', second: '2-digit',
    }).formatToParts(new Date(ms)).map((part) => [part.type, part.value]),
  );
  const wall = Date.UTC(+parts.year, +parts.month - 1, +parts.day, +parts.hour, +parts.minute, +parts.second);
  return wall - Math.floor(ms / 1000) * 1000;
}

/**
 * The instant (ms since the epoch) at which the clocks of `zone` show `date` (YYYY-MM-DD) and
 * `time` (HH:MM). Twice corrected, so that a change of offset between the guess and the answer
 * (a daylight-saving switch) is taken into account.
 */
export function zonedToInstant(date, time, zone) {
  const [year, month, day] = date.split('-').map(Number);
  const [hour, minute] = time.split(':').map(Number);
  const wall = Date.UTC(year, month - 1, day, hour, minute);
  let instant = wall - offset(wall, zone);
  instant = wall - offset(instant, zone);
  return instant;
}

const pad = (n) => String(n).padStart(2, '0');

/** The local date (YYYY-MM-DD) and time (HH:MM) of a Date, for the form's inputs. */
export function localDateAndTime(when) {
  return {
    date: `${when.getFullYear()}-${pad(when.getMonth() + 1)}-${pad(when.getDate())}`,
    time: `${pad(when.getHours())}:${pad(when.getMinutes())}`,
  };
}

/** `ms` as a date and time in `zone` (the viewer's when none is given). */
export function formatInstant(ms, zone) {
  return new Intl.DateTimeFormat(undefined, { dateStyle: 'full', timeStyle: 'short', timeZone: zone }).format(new Date(ms));
}

export function formatTime(ms, zone) {
  return new Intl.DateTimeFormat(undefined, { timeStyle: 'short', timeZone: zone }).format(new Date(ms));
}

/** `ms` as a short date and a time to the second, for logs. */
export function formatStamp(ms) {
  return new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'medium' }).format(new Date(ms));
}

/** "2 days 3 h", "1 h 05 min", "4 min 09 s": how long until `ms`. */
export function until(ms) {
  const seconds = Math.max(0, Math.round(ms / 1000));
  const days = Math.floor(seconds / 86_400);
  const hours = Math.floor((seconds % 86_400) / 3600);
  const minutes = Math.floor((seconds % 3600) / 60);
  const secs = seconds % 60;
  if (days) return `${days} day${days === 1 ? '' : 's'} ${hours} h`;
  if (hours) return `${hours} h ${String(minutes).padStart(2, '0')} min`;
  return `${minutes} min ${String(secs).padStart(2, '0')} s`;
}
